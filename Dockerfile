# One image for every role (serve, worker, migrate). Jobs run the real
# Claude Code CLI, pinned in .claude-code-version; give the worker its
# credentials (README, "Running it for a team").

# The CLI is installed by npm on a Node.js its package accepts (>= 22); its
# postinstall links the native binary into bin/claude.exe.
FROM node:22-bookworm-slim AS claude-code
COPY .claude-code-version /tmp/claude-code-version
RUN npm install -g --no-audit --no-fund "@anthropic-ai/claude-code@$(cat /tmp/claude-code-version)" \
 && test "$(claude --version)" = "$(cat /tmp/claude-code-version) (Claude Code)"

FROM python:3.11-slim-bookworm
# tini is PID 1: it forwards signals and reaps the zombies the CLI's tools
# leave behind; git is what agents use in their repositories.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Node.js (hooks, MCP servers and JS projects the agent works on need it)
# and the CLI package itself (only its own folder: bin/claude.exe is the
# native binary, so the platform package is not copied twice).
COPY --from=claude-code /usr/local/bin/node /usr/local/bin/node
COPY --from=claude-code /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
COPY --from=claude-code /usr/local/lib/node_modules/@anthropic-ai/claude-code /usr/local/lib/node_modules/@anthropic-ai/claude-code
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/@anthropic-ai/claude-code/bin/claude.exe /usr/local/bin/claude \
 && claude --version

WORKDIR /app
COPY pyproject.toml README.md .claude-code-version ./
COPY progress_service ./progress_service
COPY worker ./worker
COPY bench ./bench
COPY web ./web
RUN pip install --no-cache-dir -e .

# Not root: the CLI refuses bypassPermissions as root, and a job's tools
# should not own the container. The workspace volume inherits the owner.
RUN useradd --create-home --uid 10001 --shell /bin/bash app \
 && mkdir -p /workspace && chown app:app /workspace
USER app
ENV HOME=/home/app \
    PS_WORKSPACE_ROOT=/workspace \
    DISABLE_AUTOUPDATER=1
EXPOSE 8000
# The app's check; the compose file gives workers theirs (Redis and the CLI).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
    CMD ["python", "-m", "progress_service.healthcheck", "app"]
ENTRYPOINT ["tini", "--"]
CMD ["progress-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
