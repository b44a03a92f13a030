"""declora: decentralized and federated LoRA with one frozen base and node-stacked adapters."""

import logging


def _drop_kernels_hub_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes (the `quant` extra) logs a WARNING on import when the optional `kernels` package, which
    # fetches compiled kernels from the Hugging Face Hub at run time, is absent. PEFT imports bitsandbytes
    # whenever it is installed, so without this every run, quantized or not, printed that warning in the
    # middle of its progress bar. declora never fetches code from the Hub; bitsandbytes' own kernels serve.
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_hub_notice)

__version__ = "0.1.0"
