"""Worker processes: vLLM argv/env, the embedded model cache and the supervisor."""
