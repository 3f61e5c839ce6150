"""Top-k search over feature tables: exact (chunked, any dtype) and FAISS (optional)."""
