"""The defaults a user can change from the command line, importable without torch.

``lcnn-convert --help`` shows them without importing torch; the stages that use them import them
from here, so each lives in one place.
"""

# Convert (stage 2): the smooth ReLU that rounds ReLU-like kinks. The centered softplus is the
# paper's; swish, x sigmoid(beta x), runs at about ReLU's speed in onnxruntime (docs/benchmarks.md).
LCNN_ACTIVATIONS = ("centered_softplus", "swish")
DEFAULT_ACTIVATION = "centered_softplus"
# Export (stage 4): the oldest opset written; what torch.onnx writes and onnxruntime runs.
DEFAULT_OPSET = 17
# Verify (stage 5): the parity gate on the logits' max abs difference, and the random inputs
# compared on.
DEFAULT_ATOL = 1e-4
DEFAULT_RANDOM_INPUTS = 16
# Verify: the ONNX runtimes a file can be checked in (lcnn_convert.verify.RUNTIMES runs them);
# OpenVINO is an optional extra, pip install "lcnn-convert[openvino]".
ONNX_RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_RUNTIME = "onnxruntime"
# Convert (stage 2): calibration's target, the mean relative logit error allowed against the
# original (docs/fidelity.md has the sweep), and the fidelity gate on real held-out images.
DEFAULT_LOGIT_TOLERANCE = 0.02
DEFAULT_MIN_AGREEMENT = 0.99
# Train images beta is calibrated on.
CALIBRATION_EXAMPLES = 256
# Measure: test images curvature and the PGD curves are measured on.
EVAL_EXAMPLES = 128
