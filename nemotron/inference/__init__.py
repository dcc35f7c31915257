"""Running a model: the cache-row bookkeeping, sampling, streaming detokenization, requests, the engine
(the one batch loop) and speculative decoding."""
