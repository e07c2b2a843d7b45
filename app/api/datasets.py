"""`/v1/datasets`: upload statements or multiple-choice sets, list and show them."""

from fastapi import APIRouter

from app.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)
