"""The retrieval service: a separate gRPC process that serves dense (faiss) and BM25 search.

  retrieval.proto   wire protocol (Retrieve, Embed, Health); Python code generated from it on import
  corpus.py         streaming reader for Search-R1 corpus JSONL, with file:line errors
  docstore.py       on-disk document table (byte file + int64 offsets, memory-mapped)
  bert_weights.py   an HF BERT checkpoint (config + safetensors) read as NumPy, no framework
  bert.py           Flax BERT-family encoder (the reference); bert_jax.py runs it data-parallel on all local devices
  bert_onnx.py      the same encoder as an ONNX Runtime graph (the CPU path);  encoder.py  TextEncoder: tokenize,
                    sort by length, batch, pick the runtime
  dense_index.py    faiss Flat / fp16 / HNSW / IVF-PQ writing and searching (loaded or mmap);  bm25_index.py  bm25s
  build_index.py    CLI: corpus -> index directory (index + document store + manifest.json), or --import-faiss
  build_shards.py   resumable dense builds: vector shards and the state that says where to continue
  searcher.py       loads an index directory; one search call for a batch of queries
  batcher.py        micro-batching of concurrent requests;  server.py / http_api.py / serve.py  the process
  client.py         RetrievalClient for the trainer;  process.py  RetrievalServer subprocess launcher
"""

from retrieval_service.proto_build import ensure_generated_code

ensure_generated_code()
