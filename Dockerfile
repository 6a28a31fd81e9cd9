# drawdown in a container. Build: docker build -t drawdown .
# Run (credentials are required off loopback; create them with `htpasswd -cB htpasswd AGENT`):
#   docker run -p 8080:8080 -v $PWD/data:/data drawdown
# with ./data/htpasswd present. The CA agents must trust is written to ./data/confdir.
FROM python:3.13-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY addon ./addon
COPY policies ./policies
RUN pip install --no-cache-dir ".[postgres]"

VOLUME /data
EXPOSE 8080
ENTRYPOINT ["drawdown"]
CMD ["run", "--policy", "/app/policies/default.yaml", "--db", "/data/drawdown.db", \
     "--listen", "0.0.0.0:8080", "--confdir", "/data/confdir", \
     "--set", "proxyauth=@/data/htpasswd"]
