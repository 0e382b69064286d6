"""Gradient codecs (one per run, in DataParallel's codec slot): fp16, topk, powersgd, signsgd.

Wire accounting: each codec counts the payload bytes this rank hands to collectives per bucket, against the
bucket's float32 size; telemetry's step lines carry both ("codec_bytes", "codec_ratio") next to the
communicator's own bytes_sent.
"""

from mpnn.plugins.compression.fp16 import FP16
from mpnn.plugins.compression.powersgd import PowerSGD
from mpnn.plugins.compression.signsgd import SignSGD
from mpnn.plugins.compression.topk import TopK

__all__ = ["FP16", "TopK", "PowerSGD", "SignSGD"]
