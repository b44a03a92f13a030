"""declora: decentralized and federated LoRA with one frozen base and node-stacked adapters."""

__version__ = "0.1.0"
