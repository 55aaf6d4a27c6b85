FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY progress_service ./progress_service
COPY worker ./worker
COPY bench ./bench
COPY web ./web
RUN pip install --no-cache-dir -e . && mkdir -p /workspace
ENV PS_WORKSPACE_ROOT=/workspace
EXPOSE 8000
CMD ["progress-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
