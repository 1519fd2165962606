"""denoiser_<variant>: each window's whole DDIM + guidance loop; the steps of all windows in flight batched."""

import triton_python_backend_utils as pb_utils

from latentsync_serving.denoiser import DenoiserService


class TritonPythonModel:
    def initialize(self, args):
        self.service = DenoiserService.from_args(args, pb_utils)

    def execute(self, requests):
        for request in requests:
            self.service.submit(request)  # answered from the service's loop when the window's last step is done
        return None

    def finalize(self):
        self.service.close()
