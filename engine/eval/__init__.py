"""Evaluation of embeddings: insightface's 10-fold verification on ``.bin`` files (``verification``) and IJB-B/C 1:1
verification (``ijb`` the protocol, ``ijb_eval`` the command).

May import engine.runtime, engine.config, engine.parallel and engine.state.
"""
