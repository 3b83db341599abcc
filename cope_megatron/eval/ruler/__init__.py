"""A RULER-style long-context suite (Hsieh et al. 2024, arXiv 2404.06654) that needs no
download: prompts generated from a seed with the run's own tokenizer (``tasks``), scored
teacher-forced and by greedy generation (``scoring``) per task, length and depth, and
summarized as an effective context length (``effective``); ``suite`` runs the grid."""
