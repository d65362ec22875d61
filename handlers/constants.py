"""Constants shared by the TorchServe handler, archive building and training.

One module so that the served path and the training path can never disagree on an input size, a
limit or a normalisation. File names inside an archive are in ``handlers.layout``.
"""

# Preprocessing defaults: ImageNet statistics and the classic resize-then-crop geometry.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224

# Answers.
TOP_K = 3
VERSION_HEADER = "X-Model-Version"  # which archive version answered a prediction
# A head's answer for a photo that fits none of its classes (first entry; handlers/rejection.py).
UNKNOWN_LABEL = "unknown"
# Request header asking a head for another strictness: the share of known photos to keep, in (0, 1].
KEEP_HEADER = "X-Keep"

# Input limits. A 12-megapixel phone photo is about 4000x3000 and at most ~20 MB as a JPEG
# (config.properties' max_request_size adds room for multipart framing).
MAX_REQUEST_BYTES = 20 * 1024 * 1024
# Decoding 64 MP (about 190 MB as RGB) is the most one request may ask of a worker; anything larger
# is treated as a decompression bomb and refused before its pixels are decoded.
MAX_IMAGE_PIXELS = 64_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Precision policies an archive can be built with (handlers/runtime.py choose_precision applies them):
# auto: bf16 where the accuracy guard allowed it and the serving CPU has it; fp32: never reduced;
# bf16: as auto (kept for archives that asked for bf16 by name).
PRECISIONS = ("auto", "fp32", "bf16")
# Long side / short side. Resizing the short side to RESIZE_SIZE (256) makes an image 256^2 x this
# ratio pixels whatever its own size: a 1x20000 PNG (165 bytes, far below the megapixel limit) would
# become 256x5,120,000 (13.7 s, 5.5 GB). At 32 the resized image is at most 256x8192 (2.1 MP, 6 MB
# as RGB, a few ms), and wide panoramas (up to 32:1) still pass.
MAX_ASPECT_RATIO = 32
