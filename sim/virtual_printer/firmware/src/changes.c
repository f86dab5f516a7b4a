// Changes since the tag (bench history).
#include "command.h"
