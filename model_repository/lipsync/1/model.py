"""lipsync: decoupled, sequence-batched orchestrator; all logic lives in latentsync_serving.lipsync_service."""

import triton_python_backend_utils as pb_utils

from latentsync_serving.lipsync_service import LipSyncService


class TritonPythonModel:
    def initialize(self, args):
        self.service = LipSyncService.from_args(args, pb_utils)

    def execute(self, requests):
        for request in requests:
            self.service.submit(request)  # queued on the stream's own thread; responses are sent from there
        return None

    def finalize(self):
        self.service.close()
