"""Tasks and data: token-level task generators, their scoring, and the byte-level corpus.

Imports nothing else from `experiments`; everything else builds on it.
"""

from ._babilong import babi_samples as babi_samples, babilong as babilong, BabiSample as BabiSample
from ._capacity import (
    capacity_gates as capacity_gates,
    capacity_probe as capacity_probe,
    capacity_recall as capacity_recall,
    CapacityProbe as CapacityProbe,
    CapacityScore as CapacityScore,
    interference_probe as interference_probe,
)
from ._corpus import (
    default_cache_dir as default_cache_dir,
    excerpt_documents as excerpt_documents,
    LMBatch as LMBatch,
    load_corpus as load_corpus,
    load_excerpt as load_excerpt,
    sample_batches as sample_batches,
)
from ._corpus_fetch import fetch_corpus as fetch_corpus
from ._mad import (
    compression as compression,
    fuzzy_in_context_recall as fuzzy_in_context_recall,
    in_context_recall as in_context_recall,
    mad_accuracy as mad_accuracy,
    memorization as memorization,
    noisy_in_context_recall as noisy_in_context_recall,
    selective_copying as selective_copying,
)
from ._mqar import multiquery_ar as multiquery_ar
from ._needle import single_needle as single_needle
from ._niah import s_niah as s_niah, string_match_all as string_match_all
from ._token_task import (
    decode_tokens as decode_tokens,
    encode_text as encode_text,
    exact_match as exact_match,
    IGNORE_INDEX as IGNORE_INDEX,
    masked_accuracy as masked_accuracy,
    TokenTask as TokenTask,
)
