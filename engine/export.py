"""ONNX export of a trained backbone, checked against PyTorch with onnxruntime (engine.state.onnx_export).

    python -m engine.export --model outputs/r50/model.pt --backbone r50 --embedding-size 512 --onnx r50.onnx
"""
import sys

from engine.state.onnx_export import export_onnx, graph_summary, load_backbone, main, read_state_dict, verify_onnx  # noqa: F401  (the public API)

if __name__ == "__main__":
    sys.exit(main())
