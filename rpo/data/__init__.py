"""Data input side of rpo: preference data sets in, tokenised batches and cached prompt embeddings out.

    dataset = load_preference_dataset("prefs.jsonl")                    # normalised rows + load report
    tokenized = tokenize_preference_dataset(dataset, tokenizer)          # chat template, truncation, masks
    embeddings = compute_prompt_embeddings(dataset.rows["prompt"], cache_dir=...)   # [rows, D], cached
    batcher = PreferenceBatcher(tokenized, embeddings, batch_size, rank, world_size, seed)
    train_rows, held_out = held_out_rows(len(tokenized), fraction, seed)   # the seeded eval split

See docs/data.md.
"""
from .batching import PreferenceBatcher, collate_preference_batch, even_offsets, micro_batches
from .embeddings import (DEFAULT_EMBEDDING_MODEL, OFFLINE_MODEL_PACKAGE, PromptEmbeddingCache,
                         compute_prompt_embeddings, embedding_model_key, load_sentence_transformer, prompt_text,
                         resolve_embedding_model)
from .formats import (BAD_ROW_REASONS, PAIRED, UNPAIRED, BadRowError, EmptyDataError, LoadReport, PreferenceDataset,
                      load_preference_dataset, messages_to_text, parse_column_mapping, parse_hh_transcript)
from .split import held_out_rows, select_rows
from .tokenization import (TokenizedPreferenceDataset, TokenizeReport, count_truncated_rows, render_sequence_texts,
                           tokenize_preference_dataset)

__all__ = [
    "BAD_ROW_REASONS", "DEFAULT_EMBEDDING_MODEL", "OFFLINE_MODEL_PACKAGE", "PAIRED", "UNPAIRED", "BadRowError",
    "EmptyDataError", "LoadReport", "PreferenceBatcher", "PreferenceDataset", "PromptEmbeddingCache", "TokenizeReport",
    "TokenizedPreferenceDataset", "collate_preference_batch", "compute_prompt_embeddings", "count_truncated_rows", "embedding_model_key",
    "even_offsets", "held_out_rows", "load_preference_dataset", "load_sentence_transformer", "messages_to_text",
    "micro_batches", "parse_column_mapping", "parse_hh_transcript", "prompt_text", "render_sequence_texts",
    "resolve_embedding_model", "select_rows", "tokenize_preference_dataset",
]
