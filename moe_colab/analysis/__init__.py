"""Looking at routing: what the engine's cache and prefetch rely on, measured.

    routing.py          RoutingTrace and record_routing: which experts each token used, per layer
    locality.py         reuse of experts by nearby tokens against chance, load, token kinds
    simulate.py         cache policies (LRU, LFU, FIFO, Belady) and prefetch, replayed on a trace
    prefetch_recall.py  how often layer l+1's router on layer l's state guesses the right experts
"""
