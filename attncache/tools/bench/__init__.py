"""Measurements behind `attncache bench`: rates and sizes, each measured in one run on one device.

- extract.py  `bench extract`: views/s of plain inference, teacher + capture, encode + write and extraction
- train.py    `bench train`: images/s of cached against live-teacher training, the student and the reader alone
- codecs.py   `bench codecs`: each codec's bytes per view, error against the exact maps, and MB/s
- common.py   what they share: the scratch directory, best-of-N timing, rendered views, the row divergence
"""

from .codecs import DEFAULT_BENCH_CODECS, CodecBench, bench_codecs, device_decode_rate, parse_codec_spec
from .common import BenchDir, rendered_views, row_divergence
from .extract import ExtractBench, bench_extract, build_teachers
from .train import TrainBench, bench_train

__all__ = ["DEFAULT_BENCH_CODECS", "BenchDir", "CodecBench", "ExtractBench", "TrainBench", "bench_codecs",
           "bench_extract", "bench_train", "build_teachers", "device_decode_rate", "parse_codec_spec",
           "rendered_views", "row_divergence"]
