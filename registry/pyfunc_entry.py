"""Models-from-code entry point: MLflow runs this file when it logs or loads a registered version.

Nothing imports it; importing it only tells MLflow which model object the file defines.
"""

from mlflow.models import set_model

from registry.pyfunc_model import VibrationAnomalyModel

set_model(VibrationAnomalyModel())
