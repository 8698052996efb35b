# Sourced at the start of every device call (see bench/RESULTS.md): installs the carried wheels and keeps NVLink
# multicast off. WHL names the carried wheelhouse (default .whl/: ../shared/device/make-wheelhouse.sh
# torchao==0.18.0, for the FP8 benches). The sweep bench needs MLflow instead (a sweep logs its trials there):
# WHL=.whl_sweep, built by make-wheelhouse.sh with the mlflow-skinny list in its header and without torchao
# (64 MiB carry limit); mlflow then needs a databricks stub at import (made below).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHL=${WHL:-.whl}
SITE=/tmp/site$(basename "$WHL" | tr -d .)  # one install per wheelhouse: a warm machine may have had the other
if [ ! -f $SITE/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "$WHL"/*.whl \
    && touch $SITE/.installed || return 1
  if [ -d $SITE/mlflow ]; then mkdir -p $SITE/databricks && touch $SITE/databricks/__init__.py; fi
fi
export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, diffusers, peft, ray; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'ray', ray.__version__)"
