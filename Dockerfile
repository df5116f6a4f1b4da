# One image for both agents; the command picks the role.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cipherface ./cipherface
COPY agents ./agents
RUN pip install --no-cache-dir . && cipherface weights --log-level WARNING
ENV CIPHERFACE_DATA_DIR=/data
VOLUME ["/data"]
ENTRYPOINT ["cipherface"]
