# One image for both agents; the command picks the role. It runs as an unprivileged
# user (uid 10001): the folders it writes (data, broker credentials) are its own.
FROM python:3.11-slim
WORKDIR /app
# DeepFace's weights live in the image, readable by the runtime user.
ENV DEEPFACE_HOME=/opt/deepface CIPHERFACE_DATA_DIR=/data
# numba caches the gallery kernel's compiled loops; site-packages and $HOME are not
# the runtime user's to write.
ENV NUMBA_CACHE_DIR=/tmp/numba-cache
COPY pyproject.toml README.md ./
COPY cipherface ./cipherface
COPY agents ./agents
RUN pip install --no-cache-dir . && cipherface weights --log-level WARNING \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent cipherface \
    && mkdir -p /data /credentials/onprem /credentials/cloud /credentials/client \
        /run/cipherface/broker \
    && chown cipherface:cipherface /data /credentials/* /run/cipherface/broker
USER cipherface
VOLUME ["/data"]
ENTRYPOINT ["cipherface"]
