"""The memory of a streaming video: frame sink, local window, memory bank (NAM, SMA)."""
from .bank import MemoryBank
from .nam import InProcessRanker, Ranker, nam_scores, select_best
from .prototype import Prototype, frame_means
from .sink import FrameSink
from .sma import sma_select
from .stream import StreamMemory
from .window import LocalWindow

__all__ = ["FrameSink", "LocalWindow", "MemoryBank", "Prototype", "frame_means", "Ranker",
           "InProcessRanker", "nam_scores", "select_best", "sma_select", "StreamMemory"]
