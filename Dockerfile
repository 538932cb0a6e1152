# The image the DaemonSet in deploy/ runs. Not built in this project's CI (no container
# registry is reachable there); `docker build -t corefile-resolver .` from the repository.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 iptables \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY resolver resolver
COPY plugins plugins
COPY deploy deploy
RUN pip install --no-cache-dir . && python -c "import resolver.cli"
EXPOSE 53/udp 53/tcp 9253/tcp
ENTRYPOINT ["resolver"]
CMD ["-conf", "/etc/corefile-resolver/Corefile"]
