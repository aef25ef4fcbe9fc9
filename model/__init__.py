"""The MMoE model assembled from its parts, shared by evaluation and training: the typed config
(``config``), the CLIP encoder (``encoder``), the model (``mmoe``), the tokenizer and collator
(``factory``), process groups (``distributed``) and published checkpoints (``published_checkpoint``)."""
