"""The adapter: the PEFT LoRA built from a calibration, its engines' files, steering.json, the card, publishing."""
