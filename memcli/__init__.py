"""memcli: write exact knowledge into a LoRA adapter with MemFT and prove that it is there."""

__version__ = "0.1.0"
