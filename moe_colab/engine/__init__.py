"""The engine: the paper's idea, one module per concept.

    storage.py    every expert packed into one contiguous (pinned) host buffer: one copy moves it
    cache.py      per-layer device slots, LRU eviction, a copy stream ordered with events; the
                  MoE block iterates ``cache.experts(...)``, a generator (hits first)
    hostsync.py   the one host synchronisation of a layer (which experts?)
    prefetch.py   the speculative guess: layer l+1's router on layer l's hidden state
    moe_block.py  OffloadedMoE, the module that replaces each transformers MoE block
    graphs.py     CUDA graphs for one-token calls
    compute.py    per-model choices (Triton or torch, graphs on or off) and what fell back
    build.py      build_engine: the one path that assembles an offloaded model

Reference: Eliseev & Mazur, arXiv 2312.17238, sections 3.1-3.2.
"""
from .build import Strategies, build_engine, new_store

__all__ = ["Strategies", "build_engine", "new_store"]
