this file contains words but no commands
