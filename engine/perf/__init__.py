"""Performance: the memory and FLOPs planner (``planner``), the step profiler (``profiler``) with its report
(``report``) and memory/communication census (``census``), and hardware facts (``hardware``: CPU flags, peak
FLOP/s).

May import every layer below engine.train.
"""
