"""The MMoE model assembled from its parts, shared by evaluation and training: the typed config
(``config``), the CLIP encoder (``encoder``), the model (``mmoe``), the tokenizer and collator
(``factory``), process groups (``distributed``),
published checkpoints (``published_checkpoint``) and ``with eval_mode(model):`` (``modes``)."""
