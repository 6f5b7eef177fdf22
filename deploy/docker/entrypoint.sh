#!/bin/sh
# Secrets arrive as files (docker compose `secrets:`, Kubernetes secret volumes), never as
# literals in a command line or an image: libpq reads PGPASSWORD, Ray reads its token file.
set -e
secrets=${TUNER_SECRETS_DIR:-/run/secrets}
if [ -z "${PGPASSWORD:-}" ] && [ -r "$secrets/pg_password" ]; then
  PGPASSWORD=$(cat "$secrets/pg_password")
  export PGPASSWORD
fi
if [ -r "$secrets/ray_token" ]; then
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$secrets/ray_token"
fi
# S3 artifacts (TUNER_ARTIFACTS=s3://...): boto3 reads an AWS shared credentials file.
if [ -z "${AWS_SHARED_CREDENTIALS_FILE:-}" ] && [ -r "$secrets/aws_credentials" ]; then
  export AWS_SHARED_CREDENTIALS_FILE="$secrets/aws_credentials"
fi
exec "$@"
