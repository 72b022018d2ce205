# An env server image: `epo-trl serve-env` (OpenEnv protocol) for rollouts on other machines (docs/environments.md,
# "Environments on other machines"). Not built in CI.
#   docker build -f recipes/docker/serve-env.Dockerfile --build-arg EXTRAS=openenv,scienceworld \
#     --build-arg TORCH_INDEX=<PyTorch's CPU wheel index> -t epo-env .
#   docker run -p 8001:8001 epo-env scienceworld --max_sessions 16
FROM python:3.11-slim
# ScienceWorld and TextWorldExpress run on the JVM
RUN apt-get update && apt-get install -y --no-install-recommends default-jre-headless && rm -rf /var/lib/apt/lists/*
ARG EXTRAS=openenv
# where pip finds CPU torch (PyTorch's CPU wheel index; empty = the configured index), as in the Makefile
ARG TORCH_INDEX=
WORKDIR /app
COPY pyproject.toml README.md ./
COPY epo_trl ./epo_trl
# CPU torch only: the server process never imports it, but the package depends on it
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX:+--index-url $TORCH_INDEX} \
 && pip install --no-cache-dir ".[${EXTRAS}]"
EXPOSE 8001
ENTRYPOINT ["epo-trl", "serve-env", "--host", "0.0.0.0", "--port", "8001"]
CMD ["maze"]
