"""The paper's data: collector episodes -> RLDS (tensorflow-datasets), and small synthetic datasets."""

from .episodes import Episode, EpisodeError, episode_steps, keep_mask, load_episode

__all__ = ["Episode", "EpisodeError", "episode_steps", "keep_mask", "load_episode"]
