"""Constants shared by the TorchServe handler, archive building and training.

One module so that the served path and the training path can never disagree on a file name, an
input size or a normalisation.
"""

# Preprocessing defaults: ImageNet statistics and the classic resize-then-crop geometry.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224

# Files inside a model archive (flat at the archive root, next to the handler).
# The backbone's feature body as a portable ONNX graph (imagerec/export.py writes it, handlers/runtime.py
# runs it). Its weights sit in one raw float32 file, ONNX external data named by the body's state_dict
# keys; the index says where each lies, so the eager fallback reads the same file (one copy per archive).
FEATURES_GRAPH_FILE = "features.onnx"
FEATURES_DATA_FILE = "features.onnx.data"  # the archive's serializedFile
FEATURES_INDEX_FILE = "features.index.json"
CLASSIFIER_FILE = "classifier.pt"  # plain state_dict of the backbone's ImageNet classifier (ImageNet archives)
HEAD_FILE = "head.pt"  # plain state_dict of a few-shot head
LABELS_FILE = "index_to_name.json"  # {"0": "tench", ...}, TorchServe's own convention
MODEL_INFO_FILE = "model_info.json"  # our manifest: backbone, precision, head, training record
MODEL_CONFIG_FILE = "model-config.yaml"  # TorchServe's per-model config (batching, workers)
CHECK_IMAGES_DIR = "check_images"  # a few labelled images a deployment sends before switching

# Answers.
TOP_K = 3
VERSION_HEADER = "X-Model-Version"  # which archive version answered a prediction

# Input limits. A 12-megapixel phone photo is about 4000x3000 and at most ~20 MB as a JPEG.
MAX_REQUEST_BYTES = 20 * 1024 * 1024
# Decoding 64 MP (about 190 MB as RGB) is the most one request may ask of a worker; anything larger
# is treated as a decompression bomb and refused before its pixels are decoded.
MAX_IMAGE_PIXELS = 64_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Precision policies an archive can be built with (handlers/runtime.py choose_precision applies them):
# auto: bf16 where the accuracy guard allowed it and the serving CPU has it; fp32: never reduced;
# bf16: as auto (kept for archives that asked for bf16 by name).
PRECISIONS = ("auto", "fp32", "bf16")
