"""Attention with the sequence split over context-parallel ranks: the ring that carries key
and value chunks (``ring``), softmax attention with an optional distance bias
(``softmax``) and CoPE with its gate sums carried across ranks (``cope``). Pure tensor math
over ``torch.distributed`` point-to-point calls: no model, no config."""
