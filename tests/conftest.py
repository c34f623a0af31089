import os

# Nothing may reach a model hub during the tests (there is no network; a lookup would hang).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
