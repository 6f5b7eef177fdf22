"""Trial workloads: what one trial runs. `sft`: a LoRA fine-tune with TRL."""
