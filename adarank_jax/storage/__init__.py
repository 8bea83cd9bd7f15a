"""Files on disk: atomic writes (`files`) and verified Orbax checkpoints (`checkpoint`). Imports the core."""
