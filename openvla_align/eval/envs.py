"""The paper's evaluation environments (Simpler/ManiSkill WidowX, from the RL4VLA benchmark) and their grouping."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

_P = "PutOnPlateInScene25"
OOD_AXES: Dict[str, Tuple[str, ...]] = {
    "Semantic": tuple(f"{_P}{n}-v1" for n in ("Carrot", "Instruct", "MultiCarrot", "MultiPlate", "Plate")),
    "Vision": tuple(
        f"{_P}{n}-v1" for n in ("VisionImage", "VisionTexture03", "VisionTexture05", "VisionWhole03", "VisionWhole05")
    ),
    "Execution": tuple(f"{_P}{n}-v1" for n in ("Position", "EEPose", "PositionChangeTo")),
}
# Short column names as the paper's Table 1 prints them.
SHORT_NAMES: Dict[str, str] = {
    f"{_P}Carrot-v1": "Carrot",
    f"{_P}Instruct-v1": "Instruct",
    f"{_P}MultiCarrot-v1": "MultiCarrot",
    f"{_P}MultiPlate-v1": "MultiPlate",
    f"{_P}Plate-v1": "Plate",
    f"{_P}VisionImage-v1": "VisionImg",
    f"{_P}VisionTexture03-v1": "Tex03",
    f"{_P}VisionTexture05-v1": "Tex05",
    f"{_P}VisionWhole03-v1": "Whole03",
    f"{_P}VisionWhole05-v1": "Whole05",
    f"{_P}Position-v1": "Position",
    f"{_P}EEPose-v1": "EEPose",
    f"{_P}PositionChangeTo-v1": "PosChangeTo",
}
VL_THINK: Dict[str, str] = {
    "PutOnShapeInSceneMultiColor-v1": "Shape",
    "PutOnColorInSceneMulti-v1": "Color",
    "PutOnSignTrafficInSceneMulti-v1": "Traffic signs",
    "PutOnLaundryIconInSceneMulti-v1": "Laundry icons",
    "PutOnWeatherIconInSceneMulti-v1": "Weather icons",
    "PutOnArrowSignInSceneMulti-v1": "Arrows",
    "PutOnPublicInfoSignInSceneMulti-v1": "Public-information signs",
    "PutOnNumberInSceneParity-v1": "Numeral parity",
}
OOD_ENVS: Tuple[str, ...] = tuple(e for envs in OOD_AXES.values() for e in envs)
# The fine-tuning task's own environment (in distribution), where the warm-up and SFT data were collected.
IN_DISTRIBUTION = f"{_P}Main-v3"
PAPER_ENVS: Tuple[str, ...] = (IN_DISTRIBUTION, *OOD_ENVS, *VL_THINK)


def axis_of(env_id: str) -> Optional[str]:
    for axis, envs in OOD_AXES.items():
        if env_id in envs:
            return axis
    return "VL-Think" if env_id in VL_THINK else None


def short_name(env_id: str) -> str:
    return SHORT_NAMES.get(env_id) or VL_THINK.get(env_id) or env_id
