"""Attention with the sequence split over context-parallel ranks: the chunk layout, document
parts and the ring that carries key and value chunks (``ring``); softmax attention with an
optional position bias (``softmax``); and the PEs whose running sums cross ranks, each
carried exactly: CoPE's gate sums (``cope``), FoX's forget-gate prefix (``fox``) and
stick-breaking's log-survival (``stickbreaking``). Pure tensor math over
``torch.distributed`` point-to-point calls (and one all-reduce, FoX's): no model, no
config."""
