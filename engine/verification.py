"""The verification protocol's stable import path: ``engine.verification.evaluate(embeddings, issame)``.

The implementation is engine/eval/verification.py.
"""
from engine.eval.verification import *  # noqa: F401,F403
from engine.eval.verification import __all__  # noqa: F401
