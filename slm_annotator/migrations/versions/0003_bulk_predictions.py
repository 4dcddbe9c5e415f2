"""bulk predictions: the prediction cache and the (task, version) rows pushed to Label Studio

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('prediction_cache',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('task_id', sa.BigInteger(), nullable=False),
    sa.Column('data_hash', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=255), nullable=False),
    sa.Column('variant', sa.String(length=32), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'task_id', 'model_version', 'variant', name='uq_prediction_cache')
    )
    with op.batch_alter_table('prediction_cache', schema=None) as batch_op:
        batch_op.create_index('ix_prediction_cache_version', ['project_id', 'model_version'], unique=False)
    op.create_table('pushed_predictions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('task_id', sa.BigInteger(), nullable=False),
    sa.Column('model_version', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'model_version', 'task_id', name='uq_pushed_prediction')
    )
    with op.batch_alter_table('pushed_predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pushed_predictions_project_id'), ['project_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pushed_predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pushed_predictions_project_id'))
    op.drop_table('pushed_predictions')
    with op.batch_alter_table('prediction_cache', schema=None) as batch_op:
        batch_op.drop_index('ix_prediction_cache_version')
    op.drop_table('prediction_cache')
