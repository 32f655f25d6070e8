"""pytest-benchmark hooks: every saved result names the CPU kernels' instruction set."""
from slimkern import _library


def pytest_benchmark_update_machine_info(config, machine_info):
    # {"in_use", "hardware", "requested"}: SLIMKERN_CPU_CAPABILITY may force a narrower path
    machine_info["slimkern_cpu_capability"] = _library.cpu_capability()
