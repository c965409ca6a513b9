"""steer_core: from an SAE feature or steering vector to a verified, servable rank-1 PEFT LoRA.

The modules follow the data flow: model -> feature -> vector -> steer -> calibrate -> adapter -> verify -> publish.
"""

__version__ = "0.1.0"
