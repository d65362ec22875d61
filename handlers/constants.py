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

# Input limits. A 12-megapixel phone photo is about 4000x3000 and at most ~20 MB as a JPEG
# (config.properties' max_request_size adds room for multipart framing).
# Decoding 64 MP (about 190 MB as RGB) is the most one request may ask of a worker; anything larger
# is treated as a decompression bomb and refused before its pixels are decoded.
MAX_IMAGE_PIXELS = 64_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Precisions an archive can be built with.
PRECISIONS = ("fp32", "bf16")
