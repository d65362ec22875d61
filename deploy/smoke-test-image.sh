#!/usr/bin/env bash
# Smoke-test the serving image without a cluster: a throwaway build stage on top of it runs, as the
# image's non-root user, serve.py (TorchServe + one worker) and the gateway with a one-model set,
# waits for /ready, and sends a photo with the client token (200, the expected label), a wrong token
# (401) and a metrics scrape. The build fails if any of it fails.
#   sudo deploy/smoke-test-image.sh IMAGE ARCHIVE PHOTO LABEL
#   e.g. imagerec-serve:dev archives/efficientnet_lite0_v1.0.mar ../shared/samples/coffee.png espresso
# ISOLATION=chroot where podman cannot run an OCI runtime. Uses loopback ports 38180-38183.
set -euo pipefail
image=$1 archive=$2 photo=$3 label=$4
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/models"
cp "$archive" "$context/models/"
cp "$photo" "$context/photo"
name=$(basename "$archive" .mar)  # NAME_vVERSION
model=${name%_v*} version=${name##*_v}
cat > "$context/model-set.json" <<JSON
{"revision": "smoke", "models": [{"name": "$model", "version": "$version", "archive": "$(basename "$archive")",
  "checks": [{"file": "/smoke/photo", "label": "$label"}]}]}
JSON
cat > "$context/smoke.py" <<'PY'
import json, sys, time, urllib.error, urllib.request as u
model, label = sys.argv[1], sys.argv[2]
gateway = "http://127.0.0.1:38183"
def call(path, data=None, token=None):
    request = u.Request(gateway + path, data=data, method="PUT" if data else "GET",
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
                        if token else {})
    try:
        with u.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return -1, b""
deadline = time.monotonic() + 600
while call("/ready")[0] != 200:
    assert time.monotonic() < deadline, "gateway never became ready"
    time.sleep(2)
photo = open("/smoke/photo", "rb").read()
status, body = call(f"/predictions/{model}", photo, "smoke-token-0123456789abcdef")
assert status == 200 and json.loads(body)[0]["label"] == label, (status, body[:300])
assert call(f"/predictions/{model}", photo, "wrong-token")[0] == 401
status, body = call("/metrics")
assert status == 200 and b"PredictionsByLabel" in body, (status, body[:300])
print("smoke test passed:", json.loads(call("/ready")[1]))
PY
cat > "$context/run.sh" <<'SH'
set -e
model=$1 version=$2 label=$3
mkdir -p /tmp/smoke
echo smoke-token-0123456789abcdef > /tmp/smoke/token
id
python scripts/serve.py --backbone "$model" --version "$version" --model-store /smoke/models \
  --workdir /tmp/smoke/ts --no-restore --ports 38180 38181 38182 > /tmp/smoke/serve.log 2>&1 &
serve=$!
python scripts/gateway.py --port 38183 --model-set /smoke/model-set.json --token-file /tmp/smoke/token \
  --inference http://127.0.0.1:38180 --management http://127.0.0.1:38181 --metrics http://127.0.0.1:38182 \
  --key-file /tmp/smoke/ts/key_file.json --model-store /smoke/models > /tmp/smoke/gateway.log 2>&1 &
gateway=$!
ok=0
python /smoke/smoke.py "$model" "$label" || ok=1
[ $ok -eq 0 ] || tail -n 30 /tmp/smoke/serve.log /tmp/smoke/gateway.log /tmp/smoke/ts/logs/model_log.log
kill -TERM "$gateway" "$serve"
wait || true
exit $ok
SH
cat > "$context/Containerfile" <<EOF2
FROM $image
COPY --chown=10001:10001 . /smoke/
RUN sh /smoke/run.sh "$model" "$version" "$label"
EOF2
podman build --isolation "${ISOLATION:-oci}" --network=host --no-cache -t imagerec-smoke:latest "$context"
podman rmi imagerec-smoke:latest >/dev/null
