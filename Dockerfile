# The Costline worker image (used by docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY schemas ./schemas
COPY streams ./streams
COPY sql ./sql
COPY config ./config
RUN pip install --no-cache-dir -c constraints.txt -e . \
 && useradd --create-home costline && mkdir -p /data && chown costline /data
USER costline
# Listening on every address, the worker needs COSTLINE_WEB_TOKEN (it refuses to start without one).
ENV COSTLINE_HOME=/data COSTLINE_WEB_HOST=0.0.0.0
EXPOSE 6066
CMD ["costline", "worker"]
