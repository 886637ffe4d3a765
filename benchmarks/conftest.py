import platform

import pytest
import torch

import captcha_fast


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["captcha_fast_cuda_kernels"] = captcha_fast.CUDA_KERNELS
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["processor_name"] = platform.processor()


@pytest.fixture
def sync():
    """Call inside a timed function so that CUDA work is counted."""
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
