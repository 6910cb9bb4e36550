"""Stage 4's engine: DPO with TRL and a PEFT LoRA adapter, merged and saved, and each pair's prompt through the
model once."""
